-- Scoped tokens: key-name globs, source CIDRs, binding to a certificate principal.
-- Lists are comma-separated (neither key-name globs nor CIDRs contain commas).
ALTER TABLE tokens ADD COLUMN key_globs TEXT NOT NULL DEFAULT '';
ALTER TABLE tokens ADD COLUMN cidrs TEXT NOT NULL DEFAULT '';
ALTER TABLE tokens ADD COLUMN bound_principal TEXT;
ALTER TABLE tokens ADD COLUMN description TEXT NOT NULL DEFAULT '';
