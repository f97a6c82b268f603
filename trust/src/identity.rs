//! Who a certificate names: the identity scheme.
//!
//! A certificate names its holder in a subject alternative name (DNS or URI):
//!
//! | name          | identity                 | may                                              |
//! |---------------|--------------------------|--------------------------------------------------|
//! | `worker.<id>` | the worker `<id>`        | register, heartbeat, report and leave as `<id>`  |
//! | `coordinator` | a coordinator            | read the cluster's state; call workers           |
//! | `client`      | a caller of the layer    | `MoeLayer.Forward`, `Compute`, read state        |
//! | `admin`       | an operator              | everything, including `Drain` and removals       |
//!
//! Other naming schemes (SPIFFE ids, a cert-manager DNS name per pod) map onto these with
//! `--tls-identity-map PATTERN=IDENTITY`, where `PATTERN` may hold `{id}` once and `IDENTITY`
//! may use it: `spiffe://cluster.local/ns/ml/sa/worker-{id}=worker.{id}`.

use std::fmt;

/// One identity a certificate names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    Admin,
    Coordinator,
    Client,
    Worker(String),
}

impl Identity {
    /// Parse the scheme's own spelling (`admin`, `coordinator`, `client`, `worker.<id>`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "admin" => Some(Self::Admin),
            "coordinator" => Some(Self::Coordinator),
            "client" => Some(Self::Client),
            _ => {
                let id = name.strip_prefix("worker.")?;
                expertmesh_core::limits::check_id("worker id", id).ok()?;
                Some(Self::Worker(id.to_string()))
            }
        }
    }

    /// The name a server of this identity presents, as a TLS server name.
    pub fn server_name(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Admin => f.write_str("admin"),
            Self::Coordinator => f.write_str("coordinator"),
            Self::Client => f.write_str("client"),
            Self::Worker(id) => write!(f, "worker.{id}"),
        }
    }
}

/// One `PATTERN=IDENTITY` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    prefix: String,
    /// `Some(suffix)` when the pattern holds `{id}`.
    suffix: Option<String>,
    identity: String,
}

/// How certificate names map onto identities: the scheme's own names always, plus rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityMap {
    rules: Vec<Rule>,
}

impl IdentityMap {
    /// Parse rules `PATTERN=IDENTITY` (see the module docs). Errors name the rule and why.
    pub fn parse<S: AsRef<str>>(rules: &[S]) -> Result<Self, String> {
        let mut out = Vec::new();
        for r in rules {
            let r = r.as_ref().trim();
            if r.is_empty() {
                continue;
            }
            let bad = |why: &str| {
                Err(format!(
                    "--tls-identity-map `{r}`: {why}; expected PATTERN=IDENTITY, e.g. `spiffe://example.org/worker/{{id}}=worker.{{id}}`"
                ))
            };
            let Some((pattern, identity)) = r.rsplit_once('=') else { return bad("has no `=`") };
            let holes = pattern.matches("{id}").count();
            if holes > 1 {
                return bad("the pattern holds `{id}` more than once");
            }
            if identity.contains("{id}") && holes == 0 {
                return bad("the identity uses `{id}` but the pattern has none");
            }
            let probe = identity.replace("{id}", "x");
            if Identity::parse(&probe).is_none() {
                return bad("the identity is not `admin`, `coordinator`, `client` or `worker.<id>`");
            }
            let (prefix, suffix) = match pattern.split_once("{id}") {
                Some((p, s)) => (p.to_string(), Some(s.to_string())),
                None => (pattern.to_string(), None),
            };
            if prefix.is_empty() && suffix.as_deref().is_none_or(str::is_empty) {
                return bad("the pattern is empty");
            }
            out.push(Rule { prefix, suffix, identity: identity.to_string() });
        }
        Ok(Self { rules: out })
    }

    /// The identities `names` (a certificate's DNS and URI names) stand for, sorted, no repeats.
    pub fn identities<S: AsRef<str>>(&self, names: &[S]) -> Vec<Identity> {
        let mut out = Vec::new();
        for n in names {
            let n = n.as_ref();
            out.extend(Identity::parse(n));
            for r in &self.rules {
                let mapped = match &r.suffix {
                    None => (n == r.prefix).then(|| r.identity.clone()),
                    Some(suffix) => n
                        .strip_prefix(r.prefix.as_str())
                        .and_then(|rest| rest.strip_suffix(suffix.as_str()))
                        .filter(|id| expertmesh_core::limits::check_id("id", id).is_ok())
                        .map(|id| r.identity.replace("{id}", id)),
                };
                out.extend(mapped.as_deref().and_then(Identity::parse));
            }
        }
        out.sort();
        out.dedup();
        out
    }
}

/// The DNS and URI subject alternative names of a DER certificate.
pub fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("the certificate does not parse: {e}"))?;
    let mut out = Vec::new();
    if let Some(san) = cert.subject_alternative_name().map_err(|e| format!("its subjectAltName does not parse: {e}"))? {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::URI(s) => out.push(s.to_string()),
                _ => {}
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scheme_names_parse_and_print_back() {
        for n in ["admin", "coordinator", "client", "worker.w1", "worker.gpu-0.node_3"] {
            assert_eq!(Identity::parse(n).unwrap().to_string(), n);
        }
        for n in ["", "worker.", "worker.a/b", "Admin", "workers.w1", "root"] {
            assert_eq!(Identity::parse(n), None, "{n}");
        }
    }

    #[test]
    fn rules_map_other_naming() {
        let m = IdentityMap::parse(&[
            "spiffe://cluster.local/ns/ml/sa/worker-{id}=worker.{id}",
            "ops.example.org=admin",
            "{id}.coord.ml.svc=coordinator",
        ])
        .unwrap();
        let ids = m.identities(&["spiffe://cluster.local/ns/ml/sa/worker-w7", "unrelated", "ops.example.org"]);
        assert_eq!(ids, vec![Identity::Admin, Identity::Worker("w7".into())]);
        assert_eq!(m.identities(&["c-0.coord.ml.svc"]), vec![Identity::Coordinator]);
        // An id that is not a valid worker id maps to nothing.
        assert!(m.identities(&["spiffe://cluster.local/ns/ml/sa/worker-a/b"]).is_empty());
        // The scheme's own names still count.
        assert_eq!(m.identities(&["client"]), vec![Identity::Client]);
    }

    #[test]
    fn bad_rules_are_named() {
        for (r, why) in [
            ("nothing", "has no `=`"),
            ("a{id}b{id}=worker.{id}", "more than once"),
            ("x=worker.{id}", "has none"),
            ("x=root", "is not `admin`"),
        ] {
            let e = IdentityMap::parse(&[r]).unwrap_err();
            assert!(e.contains(why) && e.contains(r), "{e}");
        }
    }
}
