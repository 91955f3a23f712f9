//! Lode's containerd side: the `lode-snapshotter` proxy snapshotter (snapshot
//! service, metadata store, daemon manager) and the `lodectl` command line.

pub mod bootstraps;
pub mod content;
pub mod convert;
pub mod cri;
pub mod ctl;
pub mod daemons;
pub mod doctor;
pub mod hosts;
pub mod instances;
pub mod lazy;
pub mod localmount;
pub mod metrics;
pub mod metrics_http;
pub mod overlay;
pub mod service;
pub mod store;
