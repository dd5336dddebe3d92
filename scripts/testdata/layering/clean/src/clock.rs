//! Lowest layer. A comment naming crate::service::Caller is not an import.
pub struct Clock;
/// Doc text: `use crate::store::Store;` is prose.
pub fn now() -> u64 {
    let _s = "crate::service::Caller"; // a string is not an import either
    let _r = r#"use crate::store::Store; "quoted""#;
    let _c = '"';
    0
}
