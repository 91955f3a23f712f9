//! Starts, supervises and recovers the `lode-fsd` daemons that serve Lode
//! images, and implements [`crate::instances::InstanceProvider`] on top of them.
