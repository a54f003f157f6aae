//! What a policy from the agent becomes in the proxy: the rules, the source groups, token
//! trust, the TLS server config, the upstream pool. Built whole from a config bundle and
//! swapped in at once on commit; a connection keeps the state it started with.

use std::sync::Arc;

use anyhow::Context;
use tokio_rustls::TlsAcceptor;

use crate::{
    config::{Bundle, Config},
    identity::token_cache::{KeyMaterial, TokenCache},
    model::{
        rules::Rule,
        settings::{ContentSettings, FeedbackSettings, ProxySettings},
    },
    policy::rules::SourceIndex,
    proxy::{tls, upstream::Upstream},
};

pub struct State {
    pub id: u64,
    pub generation: u32,
    pub config: Config,
    pub rules: Vec<Rule>,
    /// Whether any rule runs in report mode (then a second, shadow judgment is made).
    pub reporting: bool,
    pub sources: SourceIndex,
    /// `None` when no signing key is configured: every bearer token is refused.
    pub tokens: Option<TokenCache>,
    pub settings: ProxySettings,
    pub content: ContentSettings,
    pub feedback: FeedbackSettings,
    pub acceptor: TlsAcceptor,
    /// Names `Host` and an absolute-form target may carry (lower case).
    pub names: Vec<String>,
    pub upstream: Arc<Upstream>,
}

impl State {
    /// Builds a state from a bundle. Signing keys fetched for `previous` are kept: the key
    /// source itself when the fetch settings did not change, its keys per URL otherwise, so
    /// a reload never forgets them.
    pub fn build(
        id: u64,
        generation: u32,
        bundle: &Bundle,
        previous: Option<&State>,
    ) -> anyhow::Result<State> {
        let config = Config::from_bundle(bundle)?;
        let settings = config
            .proxy
            .clone()
            .context("the config has no [proxy] section")?;
        let (server, cert_names) = tls::server_config(&settings, bundle)?;
        let names = if settings.server_names.is_empty() {
            cert_names
        } else {
            settings.server_names.clone()
        };
        anyhow::ensure!(
            !names.is_empty(),
            "the certificate names no DNS host: set [proxy] server_names"
        );
        let upstream = Upstream::new(&settings, bundle).context("the upstream")?;
        let tokens = token_trust(&config, bundle, previous)?;
        Ok(State {
            id,
            generation,
            rules: config.rules.clone(),
            reporting: config.rules.iter().any(|r| r.report),
            sources: SourceIndex::new(&config),
            tokens,
            content: config.content,
            feedback: config.feedback,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            names,
            upstream: Arc::new(upstream),
            settings,
            config,
        })
    }

    /// Puts the state to use in the proxy: signing keys start refreshing (a key source kept
    /// from the previous state goes on as it was), lapsed tokens are swept.
    pub fn start(&self) {
        if let (Some(t), Ok(runtime)) = (&self.tokens, tokio::runtime::Handle::try_current()) {
            t.keep_fresh(&runtime);
        }
    }

    /// The name of group `id` as the XDP tables number them (1-based).
    pub fn group_name(&self, id: u32) -> Option<&str> {
        let i = usize::try_from(id).ok()?.checked_sub(1)?;
        self.config.groups.get(i).map(|g| g.name.as_str())
    }
}

/// The token validators and their key sources, from the bundle's bytes. Nothing is fetched
/// until the state is put to use ([`State::start`]): the agent builds states only to check
/// them, and must never fetch.
fn token_trust(
    config: &Config,
    bundle: &Bundle,
    previous: Option<&State>,
) -> anyhow::Result<Option<TokenCache>> {
    let material = KeyMaterial::gather(&config.tokens, |p| bundle.file(p).map(<[u8]>::to_vec))?;
    let previous = previous.and_then(|p| p.tokens.as_ref());
    Ok(TokenCache::build(&config.tokens, &material, previous)?)
}
