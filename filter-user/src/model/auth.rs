//! Who a request says it is from: the authentication kinds and token families rules name.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthKind {
    None,
    Basic,
    Ntlm,
    /// `Negotiate` carrying NTLM inside SPNEGO (or bare).
    Negotiate,
    /// `Negotiate` carrying a Kerberos AP-REQ (its user is not readable by ewsgate).
    Kerberos,
    Bearer,
    ClientCert,
}

impl AuthKind {
    /// NTLM and Negotiate (Kerberos included) authenticate the TCP connection to Exchange,
    /// not the request: IIS keeps the user on it for the requests that follow.
    pub fn binds_connection(self) -> bool {
        matches!(
            self,
            AuthKind::Ntlm | AuthKind::Negotiate | AuthKind::Kerberos
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            AuthKind::None => "none",
            AuthKind::Basic => "basic",
            AuthKind::Ntlm => "ntlm",
            AuthKind::Negotiate => "negotiate",
            AuthKind::Kerberos => "kerberos",
            AuthKind::Bearer => "bearer",
            AuthKind::ClientCert => "client-cert",
        }
    }

    pub fn parse(text: &str) -> Option<AuthKind> {
        [
            AuthKind::None,
            AuthKind::Basic,
            AuthKind::Ntlm,
            AuthKind::Negotiate,
            AuthKind::Kerberos,
            AuthKind::Bearer,
            AuthKind::ClientCert,
        ]
        .into_iter()
        .find(|k| k.name() == text)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// A verified Exchange callback token.
    Callback,
    /// A verified Entra ID token with the EWS permission.
    Entra,
}

impl TokenKind {
    pub fn name(self) -> &'static str {
        match self {
            TokenKind::Callback => "callback",
            TokenKind::Entra => "entra",
        }
    }
}
