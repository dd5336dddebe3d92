//! Cycles: between two sibling files, through a facade that uses its child, and
//! between two top-level modules of one layer. The check must refuse each.
pub mod keys;
pub mod quorum;
pub mod store;
