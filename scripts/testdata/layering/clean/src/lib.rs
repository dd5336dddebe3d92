//! A tree that imports one way only: the check must accept it.
pub mod clock;
pub mod keys;
pub mod service;
pub mod store;
