//! Generated protobuf and gRPC code for `arca.v1` (from `proto/`, built into `OUT_DIR`),
//! and the `Debug` of every message that carries key material, a share, a token, a PIN or
//! a TOTP secret: it prints none of them.

#![allow(missing_docs, clippy::all, clippy::unwrap_used, clippy::expect_used)]

tonic::include_proto!("arca.v1");

/// Encoded file descriptor set, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("arca_descriptor");

macro_rules! redacted_debug {
    ($t:ty, $($field:ident),*) => {
        impl std::fmt::Debug for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct(stringify!($t))
                    .field("plaintext", &"[REDACTED]")
                    $(.field(stringify!($field), &self.$field))*
                    .finish()
            }
        }
    };
}
redacted_debug!(GenerateDataKeyResponse, key_name, key_version);
redacted_debug!(WrapKeyRequest, key_name);
redacted_debug!(UnwrapKeyResponse, key_name, key_version);

impl std::fmt::Debug for InitRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitRequest")
            .field("threshold", &self.threshold)
            .field("custodians", &self.custodians)
            .field("so_pin", &"[REDACTED]")
            .field("age_recipients", &self.age_recipients)
            .finish()
    }
}
impl std::fmt::Debug for CustodianKit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustodianKit")
            .field("custodian", &self.custodian)
            .field("share", &"[REDACTED]")
            .field("token", &"[REDACTED]")
            .field("totp_uri", &"[REDACTED]")
            .finish()
    }
}
impl std::fmt::Debug for CreateTokenResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateTokenResponse")
            .field("id", &self.id)
            .field("token", &"[REDACTED]")
            .field("expires_at", &self.expires_at)
            .field("approval_request", &self.approval_request)
            .finish()
    }
}
impl std::fmt::Debug for EnrollTotpResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollTotpResponse")
            .field("totp_uri", &"[REDACTED]")
            .finish()
    }
}
impl std::fmt::Debug for UnsealRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnsealRequest")
            .field("share", &"[REDACTED]")
            .field("totp", &"[REDACTED]")
            .finish()
    }
}
impl std::fmt::Debug for ApproveRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApproveRequest")
            .field("id", &self.id)
            .field("digest", &self.digest)
            .field("share", &"[REDACTED]")
            .field("totp", &"[REDACTED]")
            .finish()
    }
}
