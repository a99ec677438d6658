//! The room occupancy script (`src/broker/redis/occupancy/room.lua`) on a private
//! redis-server: exactly one occupied and one vacated for a room over two nodes, the same
//! answer to a call sent again after it ran (its reply lost), a stale lease's field left
//! alone, and sequence numbers that keep growing after Redis forgot the room.

mod support;

use support::RedisServer;

const SCRIPT: &str = include_str!("../src/broker/redis/occupancy/room.lua");

async fn call(
    redis: &mut redis::aio::MultiplexedConnection,
    mode: &str,
    node: &str,
    lease: &str,
) -> u64 {
    redis::cmd("EVAL")
        .arg(SCRIPT)
        .arg(2)
        .arg("occupancy:{r}")
        .arg("occupancy-done:{r}")
        .arg(mode)
        .arg(node)
        .arg(lease)
        .arg(86_400_000)
        .arg(3_600_000)
        .query_async(redis)
        .await
        .unwrap()
}

#[tokio::test]
async fn occupied_and_vacated_once_and_a_repeated_call_answers_the_same() {
    let server = RedisServer::start().await;
    let mut redis = server.client().await;

    let occupied = call(&mut redis, "occupy", "a", "a:0").await;
    assert!(
        occupied > 1_700_000_000_000_000,
        "from the clock: {occupied}"
    );
    assert_eq!(
        call(&mut redis, "occupy", "a", "a:0").await,
        occupied,
        "sent again"
    );
    assert_eq!(
        call(&mut redis, "occupy", "b", "b:0").await,
        0,
        "already occupied"
    );

    assert_eq!(
        call(&mut redis, "vacate", "a", "a:0").await,
        0,
        "b is still in"
    );
    assert_eq!(
        call(&mut redis, "vacate", "a", "a:0").await,
        0,
        "sent again"
    );
    let vacated = call(&mut redis, "vacate", "b", "b:0").await;
    assert!(vacated > occupied, "{vacated} after {occupied}");
    assert_eq!(
        call(&mut redis, "vacate", "b", "b:0").await,
        vacated,
        "sent again"
    );
    // A sweep of a lease that no longer holds the room finds nothing.
    assert_eq!(call(&mut redis, "vacate", "a", "a:1").await, 0);

    // A node's old lease is replaced by its new one without an event, and a sweep of the
    // old lease leaves the new registration alone.
    let again = call(&mut redis, "occupy", "a", "a:0").await;
    assert!(again > vacated, "{again} after {vacated}");
    assert_eq!(call(&mut redis, "occupy", "a", "a:1").await, 0);
    assert_eq!(
        call(&mut redis, "vacate", "a", "a:0").await,
        0,
        "the stale lease's sweep"
    );
    let gone = call(&mut redis, "vacate", "a", "a:1").await;
    assert!(gone > again, "{gone} after {again}");

    // Redis lost its latest writes (a failover to a replica that was behind, which takes
    // longer than the millisecond that makes a thousand numbers): the room's number went
    // back, and still the next one is above every number given before.
    let _: () = redis::cmd("HSET")
        .arg("occupancy:{r}")
        .arg("#")
        .arg(occupied)
        .query_async(&mut redis)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let after_loss = call(&mut redis, "occupy", "d", "d:0").await;
    assert!(after_loss > gone, "{after_loss} after {gone}");
    let gone = call(&mut redis, "vacate", "d", "d:0").await;

    // Redis forgets the room: its numbers go on growing from the clock. A node taking its
    // members out of a room Redis forgot says nothing (others may have lost theirs too).
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut redis)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert_eq!(call(&mut redis, "vacate", "e", "e:0").await, 0);
    let reborn = call(&mut redis, "occupy", "c", "c:0").await;
    assert!(reborn > gone, "{reborn} after {gone}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg("occupancy:{r}")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(ttl, -1, "an occupied room does not expire");
    assert!(call(&mut redis, "vacate", "c", "c:0").await > reborn);
    let ttl: i64 = redis::cmd("PTTL")
        .arg("occupancy:{r}")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(ttl > 0, "a vacant room's number is kept for a while: {ttl}");
}

/// `check`: a node checking its registration under its lease changes nothing where it is
/// registered, and registers again where Redis lost it (telling the room occupied again
/// only if no other node registered first).
#[tokio::test]
async fn a_check_registers_again_only_what_redis_lost() {
    let server = RedisServer::start().await;
    let mut redis = server.client().await;
    let occupied = call(&mut redis, "occupy", "a", "a:0").await;
    assert!(occupied > 0);
    assert_eq!(call(&mut redis, "occupy", "b", "b:0").await, 0);
    assert_eq!(call(&mut redis, "check", "a", "a:0").await, 0, "registered");
    let _: () = redis::cmd("DEL")
        .arg("occupancy:{r}")
        .query_async(&mut redis)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let again = call(&mut redis, "check", "b", "b:0").await;
    assert!(again > occupied, "{again} after {occupied}");
    assert_eq!(
        call(&mut redis, "check", "a", "a:0").await,
        0,
        "b was first"
    );
    assert_eq!(call(&mut redis, "vacate", "a", "a:0").await, 0);
    assert!(call(&mut redis, "vacate", "b", "b:0").await > again);

    // A node that took its members out and registered again under the same lease, whose
    // registration Redis then lost, is registered again.
    assert!(call(&mut redis, "occupy", "c", "c:0").await > 0);
    assert!(call(&mut redis, "vacate", "c", "c:0").await > 0);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let back = call(&mut redis, "occupy", "c", "c:0").await;
    let _: () = redis::cmd("HDEL")
        .arg("occupancy:{r}")
        .arg("c")
        .query_async(&mut redis)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    assert!(call(&mut redis, "check", "c", "c:0").await > back);
    assert!(call(&mut redis, "vacate", "c", "c:0").await > back);

    // A vacate that finds no registration does not answer again the taking out that an
    // occupy under the same lease followed.
    assert!(call(&mut redis, "occupy", "e", "e:0").await > 0);
    assert!(call(&mut redis, "vacate", "e", "e:0").await > 0);
    call(&mut redis, "occupy", "e", "e:0").await;
    let _: () = redis::cmd("HDEL")
        .arg("occupancy:{r}")
        .arg("e")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(call(&mut redis, "vacate", "e", "e:0").await, 0);

    // A sweep of a lease with no registration in the room still marks it: a check under
    // it registers nothing.
    assert_eq!(call(&mut redis, "sweep", "f", "f:0").await, 0);
    assert_eq!(call(&mut redis, "check", "f", "f:0").await, 0);

    // A check under a lease a sweep took out registers nothing.
    assert!(call(&mut redis, "occupy", "b", "b:0").await > 0);
    assert!(call(&mut redis, "sweep", "b", "b:0").await > 0);
    assert_eq!(call(&mut redis, "check", "b", "b:0").await, 0);
    let registered: bool = redis::cmd("HEXISTS")
        .arg("occupancy:{r}")
        .arg("b")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(!registered, "a swept lease registered again");
}
