//! VM settings types, validation rules, on-disk schema and its versions.
