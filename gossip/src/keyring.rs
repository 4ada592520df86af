//! The federation keyring: the keys gossip datagrams are sealed with.
//!
//! One key is primary (used to seal); every key in the ring opens. A
//! rotation is three steps, each applied to every member before the next:
//! install the new key (all can open it), use it (all seal with it), remove
//! the old one. No member ever receives a datagram it cannot open.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

pub const KEY_BYTES: usize = 32;
/// Keys a ring may hold at once; rotation needs two.
pub const KEYRING_KEYS_MAX: usize = 8;

/// A 256-bit key with an id derived from it, so that datagrams can name
/// the key that sealed them without revealing it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    id: u32,
    bytes: [u8; KEY_BYTES],
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:08x})", self.id)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("a key is {KEY_BYTES} bytes in base64 (44 characters, as `hanse federation keygen` prints); this is not")]
    Malformed,
    #[error("the keyring is empty: give at least one key")]
    Empty,
    #[error("the keyring holds at most {KEYRING_KEYS_MAX} keys")]
    Full,
    #[error("key {0:08x} is not in the keyring")]
    Unknown(u32),
    #[error("key {0:08x} is the primary key; use another key first")]
    Primary(u32),
    #[error("another key with id {0:08x} is in the keyring already; make a new key (`hanse federation keygen`)")]
    SameId(u32),
    #[error("`{0}` is neither a key id (8 hex digits, as `hanse federation key list` shows) nor a key")]
    NotAnId(String),
}

impl Key {
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Key {
        let digest = Sha256::digest(bytes);
        Key { id: u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]), bytes }
    }

    /// A new random key from the operating system.
    pub fn generate() -> Key {
        let mut bytes = [0u8; KEY_BYTES];
        getrandom::fill(&mut bytes).expect("the OS random source is available");
        Key::from_bytes(bytes)
    }

    pub fn from_text(text: &str) -> Result<Key, KeyError> {
        let bytes = STANDARD.decode(text.trim()).map_err(|_| KeyError::Malformed)?;
        let bytes: [u8; KEY_BYTES] = bytes.try_into().map_err(|_| KeyError::Malformed)?;
        Ok(Key::from_bytes(bytes))
    }

    pub fn to_text(&self) -> String {
        STANDARD.encode(self.bytes)
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_BYTES] {
        &self.bytes
    }
}

#[derive(Clone, Debug)]
pub struct Keyring {
    /// The primary key first.
    keys: Vec<Key>,
}

impl Keyring {
    pub fn new(primary: Key) -> Keyring {
        Keyring { keys: vec![primary] }
    }

    /// A ring from key texts, the first primary.
    pub fn from_texts<S: AsRef<str>>(texts: &[S]) -> Result<Keyring, KeyError> {
        let mut keys = texts.iter().map(|t| Key::from_text(t.as_ref()));
        let mut ring = Keyring::new(keys.next().ok_or(KeyError::Empty)??);
        for k in keys {
            ring.install(k?)?;
        }
        Ok(ring)
    }

    pub fn primary(&self) -> &Key {
        &self.keys[0]
    }

    pub fn get(&self, id: u32) -> Option<&Key> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// The keys, primary first.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    pub fn ids(&self) -> Vec<u32> {
        self.keys.iter().map(|k| k.id).collect()
    }

    /// Accepts datagrams sealed with `key` (installing twice is harmless;
    /// another key with the same id is refused).
    pub fn install(&mut self, key: Key) -> Result<(), KeyError> {
        if let Some(held) = self.get(key.id) {
            return if *held == key { Ok(()) } else { Err(KeyError::SameId(key.id)) };
        }
        if self.keys.len() >= KEYRING_KEYS_MAX {
            return Err(KeyError::Full);
        }
        self.keys.push(key);
        Ok(())
    }

    /// Seals with `id` from now on.
    pub fn use_key(&mut self, id: u32) -> Result<(), KeyError> {
        let at = self.keys.iter().position(|k| k.id == id).ok_or(KeyError::Unknown(id))?;
        self.keys.swap(0, at);
        Ok(())
    }

    /// Stops accepting `id`; the primary key cannot be removed.
    pub fn remove(&mut self, id: u32) -> Result<(), KeyError> {
        if self.keys[0].id == id {
            return Err(KeyError::Primary(id));
        }
        let before = self.keys.len();
        self.keys.retain(|k| k.id != id);
        if self.keys.len() == before { Err(KeyError::Unknown(id)) } else { Ok(()) }
    }
}

/// A key named by its id (8 hex digits) or by the key itself.
pub fn parse_key_id(text: &str) -> Result<u32, KeyError> {
    let t = text.trim();
    if t.len() == 8 {
        if let Ok(id) = u32::from_str_radix(t, 16) {
            return Ok(id);
        }
    }
    // Echoes only the start of what was given: it may be a mistyped key.
    Key::from_text(t)
        .map(|k| k.id())
        .map_err(|_| KeyError::NotAnId(format!("{}…", t.chars().take(8).collect::<String>())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trip_and_errors() {
        let k = Key::generate();
        assert_eq!(Key::from_text(&k.to_text()), Ok(k.clone()));
        assert_eq!(k.to_text().len(), 44);
        assert_eq!(Key::from_text("c2hvcnQ="), Err(KeyError::Malformed));
        assert_eq!(Key::from_text("not base64 at all!"), Err(KeyError::Malformed));
        assert_eq!(Keyring::from_texts::<&str>(&[]).unwrap_err(), KeyError::Empty);
        assert_eq!(parse_key_id(&format!("{:08x}", k.id())), Ok(k.id()));
        assert_eq!(parse_key_id(&k.to_text()), Ok(k.id()));
        assert!(matches!(parse_key_id("xyz"), Err(KeyError::NotAnId(_))));
    }

    #[test]
    fn rotation_steps() {
        let (a, b) = (Key::generate(), Key::generate());
        let mut ring = Keyring::new(a.clone());
        ring.install(b.clone()).unwrap();
        assert_eq!(ring.primary().id(), a.id());
        assert_eq!(ring.remove(a.id()), Err(KeyError::Primary(a.id())));
        ring.use_key(b.id()).unwrap();
        assert_eq!(ring.primary().id(), b.id());
        ring.remove(a.id()).unwrap();
        assert_eq!(ring.ids(), vec![b.id()]);
        assert_eq!(ring.use_key(a.id()), Err(KeyError::Unknown(a.id())));
    }
}
