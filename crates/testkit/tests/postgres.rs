//! The test PostgreSQL of `cargo xtask test`: two fresh databases are distinct, empty and
//! usable. Without `$KEYWARD_TEST_POSTGRES` this fails and says how to get a server, as the
//! real-Envoy tests do without Envoy.

use keyward_testkit::postgres::{base_url, fresh_database};

#[test]
fn fresh_databases_are_distinct_empty_and_writable() {
    let base = base_url().unwrap_or_else(|e| panic!("{e}"));
    let a = fresh_database("testkit").unwrap_or_else(|e| panic!("{e}"));
    let b = fresh_database("testkit").unwrap_or_else(|e| panic!("{e}"));
    assert_ne!(a, b);
    for url in [&a, &b] {
        assert_ne!(url, &base);
        let mut client = postgres::Client::connect(url, postgres::NoTls).unwrap_or_else(|e| panic!("{url}: {e}"));
        let tables: i64 = client
            .query_one("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'", &[])
            .and_then(|row| row.try_get(0))
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(tables, 0, "{url} is not empty");
        client.batch_execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1)").unwrap_or_else(|e| panic!("{url}: {e}"));
    }
    // What one test writes, the other does not see.
    let mut client = postgres::Client::connect(&a, postgres::NoTls).unwrap_or_else(|e| panic!("{a}: {e}"));
    let rows: i64 = client.query_one("SELECT count(*) FROM t", &[]).and_then(|r| r.try_get(0)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(rows, 1);
}
