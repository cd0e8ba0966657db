//! The router agent as a library: the binary (`main.rs`) parses the command line and calls
//! [`app::run`]; tests and fuzz targets reach the pure cores (`http`, `labels`, `table`, ...).
pub mod access_log;
pub mod admin;
pub mod app;
pub mod balance;
pub mod cidr;
pub mod cluster;
pub mod config;
pub mod ctl;
pub mod discovery;
pub mod ebpf;
pub mod exposition;
pub mod fast_hash;
pub mod handover;
pub mod health;
pub mod host_addrs;
pub mod http;
pub mod labels;
pub mod metrics;
pub mod privilege;
pub mod probe;
pub mod proxy;
pub mod registry;
pub mod socket_lb;
pub mod table;
pub mod tls;
