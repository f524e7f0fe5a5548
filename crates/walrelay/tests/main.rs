//! Integration tests: each module covers one behaviour, against real PostgreSQL servers
//! started by the test kit.

mod apply;
mod bidirectional;
mod capture;
mod cli;
mod connect;
mod copy;
mod ddl;
mod decoder;
mod durability;
mod failover;
mod fanout;
mod ha;
mod migrate;
mod restart;
mod schema;
mod sets;
mod shutdown;
mod support;
mod tls;
mod trigger;
mod values;
mod verify;
