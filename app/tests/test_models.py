import threading

import pytest
from django.db import IntegrityError, close_old_connections, connection

from chat import store
from chat.models import Message, Room, is_valid_room_name


@pytest.mark.django_db
def test_seq_counts_up_per_room():
    first = [store.post_message("alpha", "a", f"a{n}").seq for n in range(3)]
    other = [store.post_message("beta", "b", f"b{n}").seq for n in range(2)]
    assert first == [1, 2, 3]
    assert other == [1, 2]
    alpha = Room.objects.get(name="alpha")
    assert alpha.last_seq == 3
    newest = Message.objects.get(room=alpha, seq=3)
    assert abs((newest.created - alpha.last_activity).total_seconds()) < 1


@pytest.mark.django_db
def test_message_is_stored_with_its_fields():
    message = store.post_message("alpha", "alice", "hello")
    stored = Message.objects.get(pk=message.pk)
    assert (stored.room.name, stored.seq, stored.nickname, stored.body) == ("alpha", 1, "alice", "hello")
    assert stored.created is not None
    frame = stored.as_frame()
    assert frame["created"] == stored.created.isoformat()
    assert frame["id"] == stored.pk


@pytest.mark.django_db
def test_seq_is_unique_within_a_room():
    room = Room.objects.create(name="alpha")
    Message.objects.create(room=room, seq=1, nickname="a", body="x")
    with pytest.raises(IntegrityError):
        Message.objects.create(room=room, seq=1, nickname="b", body="y")


@pytest.mark.django_db
def test_messages_are_ordered_by_seq_within_a_room():
    for n in range(5):
        store.post_message("alpha", "a", str(n))
    assert [m.seq for m in Message.objects.filter(room__name="alpha")] == [1, 2, 3, 4, 5]


@pytest.mark.django_db
def test_recent_and_since_queries():
    for n in range(1, 11):
        store.post_message("alpha", "a", f"m{n}")
    store.post_message("beta", "b", "elsewhere")
    assert [m.seq for m in store.recent_messages("alpha", 3)] == [8, 9, 10]
    assert [m.seq for m in store.messages_since("alpha", 6, 200)] == [7, 8, 9, 10]
    assert [m.seq for m in store.messages_since("alpha", 2, 3)] == [3, 4, 5]
    assert store.messages_since("alpha", 10, 200) == []
    assert store.recent_messages("nobody-here", 50) == []


@pytest.mark.django_db(transaction=True)
def test_concurrent_posters_never_share_a_seq():
    writers, per_writer = 6, 10
    errors = []
    start = threading.Barrier(writers)

    def post_many(number):
        try:
            start.wait()
            for n in range(per_writer):
                store.post_message("busy", f"w{number}", f"{n}")
        except Exception as error:  # reported to the test thread below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=post_many, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    close_old_connections()
    assert errors == []
    seqs = sorted(Message.objects.filter(room__name="busy").values_list("seq", flat=True))
    assert seqs == list(range(1, writers * per_writer + 1))
    assert Room.objects.get(name="busy").last_seq == writers * per_writer


@pytest.mark.parametrize(
    "name, valid",
    [
        ("general", True),
        ("a", True),
        ("x" * 50, True),
        ("room_1-b", True),
        ("", False),
        ("x" * 51, False),
        ("General", False),
        ("with space", False),
        ("dot.ted", False),
        ("ünï", False),
        ("new\nline", False),
        (None, False),
    ],
)
def test_room_name_rule(name, valid):
    assert is_valid_room_name(name) is valid


@pytest.mark.django_db(transaction=True)
def test_the_frames_of_a_post_are_the_frames_history_reads_back():
    # The posting path writes its own SQL (store._post_sql): what it hands the
    # sockets live must be what a later history read finds, field for field.
    store.post_message("alpha", "a", "first")
    stored = store.post_messages([("alpha", "b", "ünïcode 50 % ' \" ;"), ("beta", "c", "two", "cid-1"),
                                  ("alpha", "d", "three", "cid-2")])
    live = [m.as_frame() for m in stored]
    read = {(f["room"], f["seq"]): f for room in ("alpha", "beta")
            for f in (m.as_frame() for m in store.messages_since(room, 0, 10))}
    assert live == [read[(f["room"], f["seq"])] for f in live]
    assert [(f["room"], f["seq"]) for f in live] == [("alpha", 2), ("beta", 1), ("alpha", 3)]
    alpha = Room.objects.get(name="alpha")
    assert alpha.last_seq == 3
    assert alpha.last_activity == Message.objects.get(room=alpha, seq=3).created


@pytest.mark.django_db(transaction=True)
def test_batched_posts_get_consecutive_seqs_in_order_per_room():
    store.post_message("alpha", "a", "single first")
    stored = store.post_messages(
        [("alpha", "a", "one"), ("beta", "b", "two"), ("alpha", "c", "three")]
    )
    assert [(m.room.name, m.seq, m.body) for m in stored] == [
        ("alpha", 2, "one"), ("beta", 1, "two"), ("alpha", 3, "three")
    ]
    assert all(m.id is not None and m.created is not None for m in stored)
    assert stored[2].as_frame()["seq"] == 3
    assert store.post_message("alpha", "a", "single after").seq == 4
    assert [m.body for m in store.messages_since("alpha", 0, 10)] == [
        "single first", "one", "three", "single after"
    ]


@pytest.mark.django_db(transaction=True)
def test_batched_and_single_posters_side_by_side_never_share_a_seq():
    errors = []
    start = threading.Barrier(4)

    def post(number):
        try:
            start.wait()
            for n in range(8):
                if number % 2:
                    store.post_messages([("mixed", "w", f"{number}-{n}-a"), ("mixed", "w", f"{number}-{n}-b")])
                else:
                    store.post_message("mixed", "w", f"{number}-{n}")
        except Exception as error:  # reported to the test thread below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=post, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    seqs = sorted(store.messages_since("mixed", 0, 1000), key=lambda m: m.seq)
    assert [m.seq for m in seqs] == list(range(1, 8 * 2 + 8 * 2 * 2 + 1))


@pytest.mark.django_db(transaction=True)
def test_a_repeated_client_id_returns_the_stored_message():
    first = store.post_message("alpha", "a", "hello", "id-1")
    assert (first.seq, first.repeat) == (1, False)
    stored = store.post_messages([("alpha", "a", "hello", "id-1"), ("alpha", "a", "new", "id-2"),
                                  ("alpha", "a", "new", "id-2"), ("beta", "b", "hello", "id-1"),
                                  ("alpha", "a", "no id")])
    assert [(m.room.name, m.seq, m.repeat) for m in stored] == [
        ("alpha", 1, True), ("alpha", 2, False), ("alpha", 2, True), ("beta", 1, False), ("alpha", 3, False)]
    assert stored[0].as_frame() == first.as_frame()
    assert Room.objects.get(name="alpha").last_seq == 3
    assert Message.objects.filter(room__name="alpha").count() == 3


@pytest.mark.django_db
def test_client_id_is_unique_within_a_room_only_when_given():
    room = Room.objects.create(name="alpha")
    Message.objects.create(room=room, seq=1, nickname="a", body="x")
    Message.objects.create(room=room, seq=2, nickname="a", body="x")
    Message.objects.create(room=room, seq=3, nickname="a", body="x", client_id="k")
    with pytest.raises(IntegrityError):
        Message.objects.create(room=room, seq=4, nickname="a", body="x", client_id="k")


@pytest.mark.django_db(transaction=True)
def test_concurrent_resends_of_one_post_store_it_once():
    errors, results = [], []
    start = threading.Barrier(4)

    def post():
        try:
            start.wait()
            results.append(store.post_message("race", "w", "same", "one-post").seq)
        except Exception as error:  # reported to the test thread below
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=post) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert results == [1, 1, 1, 1]
    assert Message.objects.filter(room__name="race").count() == 1
