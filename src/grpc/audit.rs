//! `arca.v1.AuditService` over [`AuditQueries`]. (The record of every call is written by
//! the audit layer, `audited.rs`.)

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::call::{accept, reply};
use super::convert::{record_to_pb, report_to_pb};
use super::pb;
use crate::audit::code_of_name;
use crate::audit::verify::Filter;
use crate::service::{AuditQueries, ServiceError};

/// The gRPC face of the audit queries.
pub struct AuditApi {
    queries: Arc<AuditQueries>,
}

impl AuditApi {
    /// Over the audit queries.
    pub fn new(queries: Arc<AuditQueries>) -> Self {
        AuditApi { queries }
    }
}

/// The filter and page of a query request.
fn query_of(r: pb::QueryAuditRequest) -> Result<(Filter, u64, usize), ServiceError> {
    let some = |s: String| (!s.is_empty()).then_some(s);
    let result = match r.result.as_str() {
        "" => None,
        name => {
            Some(code_of_name(name).ok_or(ServiceError::InvalidArgument("unknown result code"))?)
        }
    };
    let from = match r.page_token.as_str() {
        "" => 1,
        t => t
            .parse::<u64>()
            .map_err(|_| ServiceError::InvalidArgument("invalid page token"))?,
    };
    let size = match r.page_size {
        0 => 100,
        n => n.min(1000) as usize,
    };
    let filter = Filter {
        principal: some(r.principal),
        key: some(r.key_name),
        operation: some(r.operation),
        since_ms: (r.since_ms != 0).then_some(r.since_ms),
        until_ms: (r.until_ms != 0).then_some(r.until_ms),
        result,
    };
    Ok((filter, from, size))
}

#[tonic::async_trait]
impl pb::audit_service_server::AuditService for AuditApi {
    async fn query_audit(
        &self,
        req: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<pb::QueryAuditResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = match query_of(r) {
            Ok((filter, from, size)) => self.queries.query(&c, &filter, from, size).await,
            Err(e) => Err(e),
        };
        reply(&c, out, |(records, next)| pb::QueryAuditResponse {
            records: records.into_iter().map(record_to_pb).collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        })
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let (c, r) = accept(req)?;
        let out = self.queries.verify(&c, r.from_seq).await;
        reply(&c, out, report_to_pb)
    }
}
