//! The embedded bus (a consumer reading the producer's outbox by position)
//! against the bus contract; `orderly-bus-nats` runs the same checks on
//! NATS JetStream.

use async_trait::async_trait;
use orderly_engine::broker::EventFilter;
use orderly_engine::bus::{EventSource, OutboxSource, Publisher};
use orderly_engine::bus_contract::{BusFixture, PRODUCER, check_bus};
use orderly_engine::memory_store::MemoryStore;
use orderly_engine::ports::Store;
use std::sync::Arc;

struct Embedded {
    producer: Arc<dyn Store>,
    consumer: Arc<dyn Store>,
    publisher: Publisher,
}

#[async_trait]
impl BusFixture for Embedded {
    async fn source(&self, filter: EventFilter) -> Arc<dyn EventSource> {
        let cursor = self.consumer.cursor(PRODUCER).await.expect("cursor");
        Arc::new(OutboxSource::new(PRODUCER, self.producer.clone(), self.publisher.clone(), cursor, filter))
    }

    fn published(&self, head: u64) {
        self.publisher.publish(head);
    }
}

#[tokio::test]
async fn the_embedded_bus_meets_the_bus_contract() {
    let producer: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let consumer: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let fixture = Embedded { producer: producer.clone(), consumer: consumer.clone(), publisher: Publisher::new(0) };
    check_bus(producer.as_ref(), consumer.as_ref(), &fixture).await;
}
