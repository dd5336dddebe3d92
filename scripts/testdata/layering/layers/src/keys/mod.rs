// A lower layer that re-exports a higher one's type: who uses it depends on service.
pub use crate::service::Caller;
