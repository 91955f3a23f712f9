//! On-disk record layout (see docs/format.md).
