//! The bus between the ingester and the aggregators: event files in a directory (one host) or
//! a Kafka topic (many hosts).

pub mod file;
pub mod kafka;
