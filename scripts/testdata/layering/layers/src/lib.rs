//! Layer violations: a lower layer importing from a higher one (directly, through a
//! re-export, and in a code path), a module in no layer, and a vendor crate outside its room.
pub mod extra;
pub mod keys;
pub mod service;
pub mod store;
