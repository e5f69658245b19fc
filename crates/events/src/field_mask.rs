//! `google.protobuf.FieldMask` with its canonical proto3 JSON form: one string of lowerCamelCase
//! paths separated by commas (`"firstName,tier"`), as every protobuf JSON library writes and
//! expects it. The object form `{"paths": ["first_name"]}` is read too, for producers that sent it.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The field mask of a `ContactUpdated`: the contact fields the update writes, by proto name.
#[derive(Clone, PartialEq, Eq, Hash, prost::Message)]
pub struct FieldMask {
    #[prost(string, repeated, tag = "1")]
    pub paths: Vec<String>,
}

impl Serialize for FieldMask {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let paths: Vec<String> = self.paths.iter().map(|path| lower_camel(path)).collect();
        serializer.serialize_str(&paths.join(","))
    }
}

impl<'de> Deserialize<'de> for FieldMask {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(
            untagged,
            expecting = "a FieldMask: comma-separated field names such as \"firstName,tier\""
        )]
        enum Wire {
            Canonical(String),
            Object {
                #[serde(default)]
                paths: Vec<String>,
            },
        }
        let paths = match Wire::deserialize(deserializer)? {
            Wire::Canonical(text) => text
                .split(',')
                .filter(|path| !path.is_empty())
                .map(snake)
                .collect(),
            Wire::Object { paths } => paths.iter().map(|path| snake(path)).collect(),
        };
        Ok(Self { paths })
    }
}

/// `first_name` → `firstName`.
fn lower_camel(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut upper = false;
    for c in path.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// `firstName` → `first_name` (snake_case passes unchanged).
pub(crate) fn snake(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        if c.is_ascii_uppercase() {
            out.push('_');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canonical_form_is_a_comma_separated_camel_case_string() {
        let mask = FieldMask {
            paths: vec!["first_name".into(), "tier".into(), "country_code".into()],
        };
        let json = serde_json::to_string(&mask).expect("serializes");
        assert_eq!(json, r#""firstName,tier,countryCode""#);
        assert_eq!(
            serde_json::from_str::<FieldMask>(&json).expect("reads"),
            mask
        );
        assert_eq!(
            serde_json::from_str::<FieldMask>(r#"{"paths":["first_name","tier","country_code"]}"#)
                .expect("reads the object form"),
            mask
        );
        assert_eq!(
            serde_json::from_str::<FieldMask>(r#""""#)
                .expect("empty")
                .paths,
            Vec::<String>::new()
        );
        assert!(serde_json::from_str::<FieldMask>("5").is_err());
    }
}
