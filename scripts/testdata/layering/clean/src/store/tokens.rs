use super::error::StoreError;
use super::sql;

pub(super) fn touch() -> Result<(), StoreError> {
    let _ = sql::Pool.get()?;
    Ok(())
}

#[cfg(test)]
fn only_in_tests() -> crate::service::Caller {
    crate::service::Caller
}
