pub mod fake;
pub trait Hsm {}
