//! The bus between the ingester and the aggregators: event files in a directory (one host).
//!
//! A Kafka topic is the multi-host alternative; it will sit beside `file` behind the same record
//! format.

pub mod file;
