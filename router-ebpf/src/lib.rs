//! Empty library target: lets `router-agent`'s build script depend on this crate so that cargo
//! rebuilds the agent when the eBPF sources change (the aya-template arrangement).
#![no_std]
