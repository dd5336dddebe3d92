mod sql;

use crate::service::Caller;

pub fn serve(_c: &Caller) {
    let _ = crate::extra::nothing();
}
