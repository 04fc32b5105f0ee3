"""The whole protocol in memory: devices (SecAggClient) and the server's unmasking, with dropouts at
every stage, against sums computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from facefl.secagg import server
from facefl.secagg.client import ProtocolError, SecAggClient
from facefl.secagg.roster import Roster

LENGTH = 6


def run(
    n: int,
    *,
    drop_before_share: set[int] = frozenset(),  # type: ignore[assignment]
    drop_before_upload: set[int] = frozenset(),  # type: ignore[assignment]
    drop_before_unmask: set[int] = frozenset(),  # type: ignore[assignment]
    max_degree: int = 100,
) -> tuple[np.ndarray, list[int]]:
    ids = [f"dev{i:02d}" for i in range(n)]
    clients = {i: SecAggClient(i, round_id=9) for i in ids}
    roster = Roster.build(9, [c.advertise() for c in clients.values()], graph_seed=5, max_degree=max_degree)
    sharers = [i for k, i in enumerate(ids) if k not in drop_before_share]
    outboxes = {i: clients[i].share(roster) for i in sharers}
    uploaders = [i for i in sharers if ids.index(i) not in drop_before_upload]
    inputs = {i: np.full(LENGTH, ids.index(i) + 1, dtype=np.uint32) for i in uploaders}
    masked_sum = np.zeros(LENGTH, dtype=np.uint32)
    for i in uploaders:
        inbox = {s: outboxes[s][i] for s in sharers if i in outboxes[s]}
        masked = clients[i].mask(inbox, inputs[i])
        assert not np.array_equal(masked, inputs[i])
        masked_sum += masked
    revealers = {i for i in uploaders if ids.index(i) not in drop_before_unmask}
    dropped = set(sharers) - set(uploaders)
    key_shares: dict[str, dict[str, bytes]] = {}
    seed_shares: dict[str, dict[str, bytes]] = {}
    for h in sorted(revealers):
        reveal = clients[h].unmask(dropped, uploaders)
        for owner, y in reveal.mask_key_shares.items():
            key_shares.setdefault(owner, {})[h] = y
        for owner, y in reveal.self_seed_shares.items():
            seed_shares.setdefault(owner, {})[h] = y
    assert not server.missing_secrets(
        roster, sharers=set(sharers), uploaders=set(uploaders), revealers=revealers
    )
    total = server.unmask_sum(
        masked_sum,
        roster,
        sharers=set(sharers),
        uploaders=set(uploaders),
        mask_key_shares=key_shares,
        self_seed_shares=seed_shares,
    )
    return total, [ids.index(i) + 1 for i in uploaders]


def test_no_dropouts() -> None:
    total, values = run(5)
    assert values == [1, 2, 3, 4, 5]
    assert total.tolist() == [15] * LENGTH


@pytest.mark.parametrize(
    "drops",
    [
        {"drop_before_share": {1, 4}},
        {"drop_before_upload": {0, 3}},
        {"drop_before_unmask": {2, 5}},
        {"drop_before_share": {0}, "drop_before_upload": {3}, "drop_before_unmask": {6}},
    ],
)
def test_dropouts_at_each_stage(drops: dict[str, set[int]]) -> None:
    total, values = run(8, **drops)  # type: ignore[arg-type]
    assert total.tolist() == [sum(values)] * LENGTH


def test_sparse_graph_with_dropouts() -> None:
    total, values = run(12, drop_before_upload={2}, drop_before_unmask={5}, max_degree=6)  # t = 4 of 6
    assert total.tolist() == [sum(values)] * LENGTH


def test_too_few_revealers_is_detected() -> None:
    ids = [f"d{i}" for i in range(5)]
    clients = {i: SecAggClient(i, round_id=1) for i in ids}
    roster = Roster.build(1, [c.advertise() for c in clients.values()], graph_seed=0, max_degree=10)
    # threshold is 3 of 4 neighbours: two revealers cannot recover anybody's secret
    missing = server.missing_secrets(roster, sharers=set(ids), uploaders=set(ids), revealers={"d0", "d1"})
    assert missing == ids
    with pytest.raises(server.UnmaskError, match="need 3 shares"):
        server.unmask_sum(
            np.zeros(2, np.uint32),
            roster,
            sharers=set(ids),
            uploaders=set(ids),
            mask_key_shares={},
            self_seed_shares={},
        )


def test_client_refuses_to_reveal_both_secrets_of_one_device_and_out_of_order_steps() -> None:
    ids = ["a", "b", "c", "d"]
    clients = {i: SecAggClient(i, round_id=2) for i in ids}
    with pytest.raises(ProtocolError, match="before the share stage"):
        clients["a"].mask({}, np.zeros(1, np.uint32))
    roster = Roster.build(2, [c.advertise() for c in clients.values()], graph_seed=0, max_degree=10)
    with pytest.raises(ProtocolError, match="stage 'advertise'"):
        clients["a"].advertise()
    out = {i: clients[i].share(roster) for i in ids}
    inbox = {s: out[s]["a"] for s in ids if s != "a"}
    tampered = dict(inbox, b=inbox["b"][:-1] + bytes([inbox["b"][-1] ^ 1]))
    with pytest.raises(ProtocolError, match="does not decrypt"):
        clients["a"].mask(tampered, np.zeros(3, np.uint32))
    with pytest.raises(ProtocolError, match="wrong length"):
        clients["a"].mask(dict(inbox, b=inbox["b"][:-1]), np.zeros(3, np.uint32))
    with pytest.raises(ProtocolError, match="not this device's neighbours"):
        clients["a"].mask(dict(inbox, z=inbox["b"]), np.zeros(3, np.uint32))
    clients["a"].mask(inbox, np.zeros(3, np.uint32))  # the refusals above changed nothing
    with pytest.raises(ProtocolError, match="both dropped and a survivor"):
        clients["a"].unmask({"b"}, {"a", "b", "c", "d"})
    with pytest.raises(ProtocolError, match="must be named"):
        clients["a"].unmask(set(), {"a", "b", "c"})
    with pytest.raises(ProtocolError, match="fewer survivors"):
        clients["a"].unmask({"c", "d"}, {"a", "b"})
    reveal = clients["a"].unmask({"d"}, {"a", "b", "c"})
    assert set(reveal.mask_key_shares) == {"d"} and set(reveal.self_seed_shares) == {"b", "c"}
    with pytest.raises(
        ProtocolError, match="stage 'unmask'"
    ):  # a second request (e.g. the survivors swapped)
        clients["a"].unmask({"b"}, {"a", "c", "d"})


def test_roster_refuses_keys_of_another_device() -> None:
    a, b = SecAggClient("a", 1), SecAggClient("b", 1)
    ad_a, ad_b = a.advertise(), b.advertise()
    with pytest.raises(ValueError, match="distinct"):
        Roster.build(1, [ad_a, type(ad_b)("b", ad_a.c_public, ad_b.s_public)], graph_seed=0, max_degree=4)
    with pytest.raises(ProtocolError, match="other keys"):
        a.share(
            Roster.build(1, [type(ad_a)("a", ad_b.c_public + b"", ad_a.s_public)], graph_seed=0, max_degree=4)
        )
