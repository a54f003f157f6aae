//! What a policy from the agent becomes in the proxy: the rules, the source groups, token
//! trust, the TLS server config, the upstream pool. Built whole from a config bundle and
//! swapped in at once on commit; a connection keeps the state it started with.

use std::{path::Path, sync::Arc};

use anyhow::Context;
use tokio_rustls::TlsAcceptor;

use crate::{
    config::{Bundle, Config},
    identity::{
        entra::EntraValidator,
        metadata::KeySource,
        token_cache::TokenCache,
        tokens::{KeyRing, Validator},
    },
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
    pub tokens: Option<std::sync::Mutex<TokenCache>>,
    pub keys: Option<Arc<KeySource>>,
    pub settings: ProxySettings,
    pub content: ContentSettings,
    pub feedback: FeedbackSettings,
    pub acceptor: TlsAcceptor,
    /// Names `Host` and an absolute-form target may carry (lower case).
    pub names: Vec<String>,
    pub upstream: Arc<Upstream>,
}

impl State {
    /// Builds a state from a bundle. Signing keys fetched for `previous` are kept when the
    /// fetch settings did not change, so a reload never forgets them.
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
        let (tokens, keys) = token_trust(&config, bundle, previous)?;
        Ok(State {
            id,
            generation,
            rules: config.rules.clone(),
            reporting: config.rules.iter().any(|r| r.report),
            sources: SourceIndex::new(&config),
            tokens,
            keys,
            content: config.content,
            feedback: config.feedback,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            names,
            upstream: Arc::new(upstream),
            settings,
            config,
        })
    }

    /// The name of group `id` as the XDP tables number them (1-based).
    pub fn group_name(&self, id: u32) -> Option<&str> {
        let i = usize::try_from(id).ok()?.checked_sub(1)?;
        self.config.groups.get(i).map(|g| g.name.as_str())
    }
}

type Trust = (Option<std::sync::Mutex<TokenCache>>, Option<Arc<KeySource>>);

fn token_trust(
    config: &Config,
    bundle: &Bundle,
    previous: Option<&State>,
) -> anyhow::Result<Trust> {
    let t = &config.tokens;
    let kept = previous
        .and_then(|p| p.keys.clone())
        .filter(|k| Some(&k.settings) == t.fetch.as_ref());
    let keys = match (kept, t.fetch.clone()) {
        (Some(k), _) => Some(k),
        (None, Some(settings)) => {
            let source = Arc::new(KeySource::new(settings)?);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                crate::identity::metadata::keep_fresh(&source, &runtime);
            }
            Some(source)
        }
        (None, None) => None,
    };
    let entra = t
        .entra
        .as_ref()
        .map(|e| EntraValidator::load(e, t.expect.leeway))
        .transpose()
        .context("[tokens.entra] keys_file")?;
    if t.certificates.is_empty() && keys.is_none() && entra.is_none() {
        return Ok((None, keys));
    }
    let mut ring = KeyRing::default();
    for path in &t.certificates {
        let pem = text(bundle, path)?;
        ring.add_pem(&pem)
            .with_context(|| format!("{}", path.display()))?;
    }
    let validator = Validator {
        keys: ring,
        fetched: keys.as_ref().map(|k| k.ring.clone()),
        expect: t.expect.clone(),
        entra,
    };
    let cache = TokenCache::new(validator, t.cache_entries);
    Ok((Some(std::sync::Mutex::new(cache)), keys))
}

fn text(bundle: &Bundle, path: &Path) -> anyhow::Result<String> {
    let bytes = bundle.file(path)?;
    String::from_utf8(bytes.to_vec()).with_context(|| format!("{}: not UTF-8", path.display()))
}
