//! [`ConnectSource`]: Connect behind a per-run cache. Each item is fetched
//! at most once per run; concurrent references to one item wait for the
//! first request instead of sending their own. Nothing touches the disk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use super::connect::{ConnectClient, ConnectError, Item};
use super::resolve::{SecretError, SecretSource};
use super::{Reference, SecretValue};

/// (vault id, item name or id).
type ItemKey = (String, String);

type Shared<T> = Arc<OnceLock<Result<T, SecretError>>>;

/// Connect with a per-run cache (vault ids and full items).
pub struct ConnectSource {
    client: ConnectClient,
    vaults: Mutex<HashMap<String, Shared<String>>>,
    items: Mutex<HashMap<ItemKey, Shared<Arc<Item>>>>,
}

/// Connect down or failing is worth retrying next run; a wrong reference is not.
fn classify(e: ConnectError) -> SecretError {
    let transient = matches!(
        e,
        ConnectError::Unreachable { .. } | ConnectError::Server { .. }
    );
    if transient {
        SecretError::Unavailable(e.to_string())
    } else {
        SecretError::Failed(e.to_string())
    }
}

impl ConnectSource {
    pub fn new(client: ConnectClient) -> ConnectSource {
        ConnectSource {
            client,
            vaults: Mutex::new(HashMap::new()),
            items: Mutex::new(HashMap::new()),
        }
    }

    /// The client, for request counts in tests.
    pub fn client(&self) -> &ConnectClient {
        &self.client
    }

    /// Gets or computes a cached value; concurrent callers for one key wait
    /// for the first one's request instead of sending their own.
    fn cached<K: std::hash::Hash + Eq + Clone, T: Clone>(
        map: &Mutex<HashMap<K, Shared<T>>>,
        key: &K,
        fetch: impl FnOnce() -> Result<T, SecretError>,
    ) -> Result<T, SecretError> {
        let cell = map.lock().unwrap().entry(key.clone()).or_default().clone();
        cell.get_or_init(fetch).clone()
    }

    fn item(&self, vault: &str, item: &str) -> Result<Arc<Item>, SecretError> {
        let vault_id = Self::cached(&self.vaults, &vault.to_string(), || {
            self.client.vault_id(vault).map_err(classify)
        })?;
        Self::cached(&self.items, &(vault_id.clone(), item.to_string()), || {
            self.client
                .item(&vault_id, item)
                .map(Arc::new)
                .map_err(classify)
        })
    }
}

impl SecretSource for ConnectSource {
    fn resolve(&self, reference: &Reference) -> Result<SecretValue, SecretError> {
        let item = self.item(&reference.vault, &reference.item)?;
        item.field(reference).cloned().map_err(classify)
    }
}
