//! Lode's containerd snapshotter side: image conversion and the `lodectl`
//! command line.

pub mod convert;
pub mod ctl;
pub mod localmount;
