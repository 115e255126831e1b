//! The keys the configuration parser accepts, read from the parser itself.
//!
//! serde hands every struct's field names to
//! [`Deserializer::deserialize_struct`](serde::Deserializer::deserialize_struct).
//! [`Lister`] is a deserializer that feeds the `Raw*` structs a made-up
//! configuration: each struct gets every one of its fields, each field's value
//! a `Lister` one level down, and each map (`providers`) one entry, `NAME`.
//! A value that is neither a struct nor a map is a key, recorded under its
//! dotted path (`server.listen`, `providers.NAME.rate_limit.per`). So a field
//! added to a `Raw*` struct is a key here, with no list kept by hand; the
//! configuration reference (docs/configuration.md) is checked against it by
//! `tests/docs.rs`.

use std::cell::RefCell;
use std::collections::BTreeSet;

use serde::de::value::{Error, StrDeserializer};
use serde::de::{DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

/// The name that stands for any provider's name in a key.
pub const PROVIDER_NAME: &str = "NAME";

/// Every key of the configuration file, dotted (`store.rotation_journal`,
/// `providers.NAME.request_timeout`), sorted. Tables (`server`,
/// `providers.NAME`, `providers.NAME.rate_limit`) are not keys themselves:
/// their keys are.
pub fn known_keys() -> Vec<String> {
    let keys = RefCell::new(BTreeSet::new());
    // The made-up configuration itself is thrown away; a walk that fails
    // would have missed keys, so it must not.
    if let Err(e) = super::RawConfig::deserialize(Lister {
        path: String::new(),
        keys: &keys,
    }) {
        panic!("the config parser's structs could not be walked: {e}");
    }
    keys.into_inner().into_iter().collect()
}

/// Deserializes any `Raw*` type, recording the keys it asks for.
struct Lister<'k> {
    /// The dotted path of the value being deserialized ("" at the top).
    path: String,
    keys: &'k RefCell<BTreeSet<String>>,
}

impl<'k> Lister<'k> {
    fn child(&self, name: &str) -> Lister<'k> {
        let path = if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        };
        Lister {
            path,
            keys: self.keys,
        }
    }

    /// This value is a key (not a table).
    fn leaf(&self) {
        self.keys.borrow_mut().insert(self.path.clone());
    }
}

/// The entries of a made-up table: each name once, its value a [`Lister`].
struct Entries<'k> {
    parent: Lister<'k>,
    names: std::iter::Copied<std::slice::Iter<'static, &'static str>>,
    next: Option<&'static str>,
}

impl<'de, 'k> MapAccess<'de> for Entries<'k> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some(name) = self.names.next() else {
            return Ok(None);
        };
        self.next = Some(name);
        let key: StrDeserializer<'_, Error> = name.into_deserializer();
        seed.deserialize(key).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let name = self.next.take().unwrap_or_default();
        seed.deserialize(self.parent.child(name))
    }
}

impl<'de, 'k> Deserializer<'de> for Lister<'k> {
    type Error = Error;

    /// A value of any type (a duration: a number or a string): the number 1.
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.leaf();
        visitor.visit_u64(1)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_map(Entries {
            parent: self,
            names: fields.iter().copied(),
            next: None,
        })
    }

    /// A map keyed by a name (`providers`): one entry, named [`PROVIDER_NAME`].
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_map(Entries {
            parent: self,
            names: [PROVIDER_NAME].iter().copied(),
            next: None,
        })
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    /// An enum (`kind`): its first variant.
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.leaf();
        let first: StrDeserializer<'_, Error> = variants
            .first()
            .copied()
            .unwrap_or_default()
            .into_deserializer();
        visitor.visit_enum(first)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.leaf();
        visitor.visit_str("x")
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    /// A list (`scopes`): a key, given empty.
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.leaf();
        visitor.visit_seq(serde::de::value::SeqDeserializer::<_, Error>::new(
            std::iter::empty::<u64>(),
        ))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.leaf();
        visitor.visit_bool(false)
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.leaf();
        visitor.visit_f64(1.0)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_f32(visitor)
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 char bytes byte_buf unit
        unit_struct tuple tuple_struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_every_kind_of_key() {
        let keys = known_keys();
        for key in [
            "server.listen",             // a string
            "server.connect_rate_limit", // a number
            "server.shutdown_grace",     // a duration
            "store.key_file",            // a path
            "store.rotation_journal",
            "admin.token_env",
            "providers.NAME.kind",                // an enum
            "providers.NAME.refresh_ahead",       // a bool
            "providers.NAME.rate_limit.requests", // a nested table's
            "providers.NAME.rate_limit.per",
            "providers.NAME.refresh_idle_after",
            "notify.url", // an optional table's
            "notify.keep_given_up",
        ] {
            assert!(keys.iter().any(|k| k == key), "{key} in {keys:?}");
        }
        // Tables are not keys.
        for table in [
            "server",
            "providers",
            "providers.NAME",
            "providers.NAME.rate_limit",
            "notify",
        ] {
            assert!(!keys.iter().any(|k| k == table), "{table}");
        }
    }
}
