"""Fan-out: one encoding per process, batches, order, gap filling and the behind path."""

import asyncio
import json

import pytest
from channels.db import database_sync_to_async

from chat import fanout, store

from .conftest import receive_messages
from .test_consumers import send_message

pytestmark = pytest.mark.django_db(transaction=True)


@database_sync_to_async
def _post(room_name, body):
    return store.post_message(room_name, "bot", body).as_frame()


async def test_messages_within_the_window_arrive_as_one_batch(join, room, monkeypatch):
    monkeypatch.setattr(fanout, "BATCH_WINDOW", 0.3)
    client, _ = await join(room)
    posted = [await _post(room, f"m{number}") for number in range(1, 4)]
    for message in posted:
        await fanout.publish(room, message)

    frame = await client.receive_json_from(timeout=5)
    assert frame["type"] == "batch"
    assert frame["messages"] == posted
    assert await client.receive_nothing(timeout=0.4)


async def test_a_lone_message_keeps_the_message_frame(join, room, monkeypatch):
    monkeypatch.setattr(fanout, "BATCH_WINDOW", 0.05)
    client, _ = await join(room)
    message = await _post(room, "alone")
    await fanout.publish(room, message)
    assert await client.receive_json_from(timeout=5) == message


async def test_out_of_order_publishes_are_delivered_in_seq_order(join, room, monkeypatch):
    # A long gap wait: order must come from holding, not from the database.
    monkeypatch.setattr(fanout, "GAP_WAIT", 30)
    client, _ = await join(room)
    first, second, third = [await _post(room, f"m{number}") for number in range(1, 4)]
    for message in (third, first, second):
        await fanout.publish(room, message)
    messages, _ = await receive_messages(client, 3, timeout=2)
    assert [m["seq"] for m in messages] == [1, 2, 3]


async def test_a_message_the_layer_lost_is_filled_from_the_database(join, room, monkeypatch, layer_kind):
    monkeypatch.setattr(fanout, "GAP_WAIT", 0.05)
    client, _ = await join(room)
    lost = await _post(room, "never published")
    later = await _post(room, "published")
    await fanout.publish(room, later)
    messages, _ = await receive_messages(client, 2)
    assert messages == [lost, later]


async def test_concurrent_senders_every_client_gets_all_in_order(join, room, layer_kind):
    clients = [(await join(room))[0] for _ in range(3)]
    for round_number in range(5):
        await asyncio.gather(
            *(
                client.send_json_to(
                    {"type": "message", "nickname": f"c{index}", "body": f"{round_number}"}
                )
                for index, client in enumerate(clients)
            )
        )
    for client in clients:
        messages, _ = await receive_messages(client, 15)
        assert [m["seq"] for m in messages] == list(range(1, 16))
        assert await client.receive_nothing(timeout=0.2)


async def test_a_message_posted_before_joining_comes_in_history_not_live(join, room):
    earlier = await _post(room, "before")
    client, history = await join(room)
    assert history == [earlier]
    # The hub starts after the room's last seq: a late publish of an old message is dropped.
    await fanout.publish(room, earlier)
    assert await client.receive_nothing(timeout=0.3)


class FakeSubscriber:
    """Records what the hub hands out, to compare identities."""

    def __init__(self):
        self.offers = []

    def offer(self, frame, items, stored_at=None):
        self.offers.append((frame, items))

    def stop(self):
        pass


async def test_the_hub_encodes_once_and_hands_every_socket_the_same_text(room, close_layers):
    from channels.layers import get_channel_layer

    hub = fanout.Hub(get_channel_layer())
    subscribers = [FakeSubscriber() for _ in range(3)]
    for subscriber in subscribers:
        await hub.join(room, subscriber)
    message = await _post(room, "shared")
    hub.deliver(message)
    hub._flush(hub.rooms[room])
    frames = [subscriber.offers[0][0] for subscriber in subscribers]
    assert json.loads(frames[0]) == message
    assert all(frame is frames[0] for frame in frames)
    for subscriber in subscribers:
        hub.leave(room, subscriber)
    await asyncio.sleep(0.1)  # the group_discard task
    assert hub.rooms == {}


def offer(subscriber, frame, items):
    """What the hub's flush does with one socket."""
    if subscriber.offer(frame, items):
        asyncio.get_running_loop().create_task(subscriber.send_now(frame))


def _items(*seqs):
    return [(seq, fanout.dumps({"type": "message", "seq": seq})) for seq in seqs]


async def test_a_socket_beyond_its_backlog_is_told_it_is_behind():
    sent = []
    gate = asyncio.Event()

    async def slow_send(text):
        sent.append(json.loads(text))
        await gate.wait()  # a reader that does not keep up

    subscriber = fanout.Subscriber(slow_send, backlog=3)
    subscriber.start()
    offer(subscriber, _items(1)[0][1], _items(1))
    await asyncio.sleep(0)  # seq 1 is being sent; the send hangs
    for seq in range(2, 5):  # fills the backlog of 3
        offer(subscriber, _items(seq)[0][1], _items(seq))
    offer(subscriber, fanout.batch_text([t for _, t in _items(5, 6)]), _items(5, 6))  # overflow
    offer(subscriber, _items(7)[0][1], _items(7))
    gate.set()
    for _ in range(10):
        await asyncio.sleep(0.01)
    assert sent[0] == {"type": "message", "seq": 1}
    # 2..6 were dropped and said so; 7 follows, for the client to hold until it caught up.
    assert sent[1] == {"type": "behind", "since": 1, "until": 6}
    assert sent[2] == {"type": "message", "seq": 7}
    assert len(sent) == 3


async def test_queued_flushes_of_a_slow_socket_merge_into_one_batch():
    sent = []
    gate = asyncio.Event()

    async def slow_send(text):
        sent.append(json.loads(text))
        await gate.wait()

    subscriber = fanout.Subscriber(slow_send, backlog=10)
    subscriber.start()
    offer(subscriber, _items(1)[0][1], _items(1))
    await asyncio.sleep(0)
    offer(subscriber, _items(2)[0][1], _items(2))
    offer(subscriber, fanout.batch_text([t for _, t in _items(3, 4)]), _items(3, 4))
    gate.set()
    for _ in range(10):
        await asyncio.sleep(0.01)
    assert sent[1] == {"type": "batch", "messages": [{"type": "message", "seq": s} for s in (2, 3, 4)]}
    assert len(sent) == 2


async def test_a_paused_subscriber_queues_until_started():
    sent = []

    async def send(text):
        sent.append(json.loads(text))

    subscriber = fanout.Subscriber(send, backlog=10)
    offer(subscriber, _items(1)[0][1], _items(1))
    await asyncio.sleep(0.01)
    assert sent == []
    subscriber.start()
    await asyncio.sleep(0.01)
    assert sent == [{"type": "message", "seq": 1}]


async def test_a_room_emptied_and_joined_again_still_gets_messages(connect, room, layer_kind):
    # The pub/sub layer forgets a channel whose receive was cancelled: a hub
    # that stopped reading must not reuse it (this failed handshakes with 500).
    first = await connect(f"/ws/chat/{room}/")
    await first.receive_json_from(timeout=5)
    await first.disconnect(timeout=5)
    await asyncio.sleep(0.2)  # the hub leaves the group and stops reading
    assert fanout.get_hub().reader is None
    client = await connect(f"/ws/chat/{room}/")
    await client.receive_json_from(timeout=5)
    await send_message(client, "back again")
    assert (await client.receive_json_from(timeout=5))["body"] == "back again"
