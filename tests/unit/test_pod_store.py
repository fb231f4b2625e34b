"""The pod informer's store (embedjob/operator/informer.py PodStore): which jobs a change
wakes, and what a completed list removes. The list/watch itself: tests/kube/test_informer.py."""

from __future__ import annotations

from dataclasses import replace

from embedjob.operator.informer import PodStore
from embedjob.operator.pod_wire import Change
from embedjob.operator.views import PodView


def view(name: str, phase: str = "Pending") -> PodView:
    return PodView(name=name, role="worker", shard=0, attempt=0, phase=phase)


def change(ns: str, name: str, uid: str, phase: str | None = "Pending") -> Change:
    return Change((ns, name), uid, view(name, phase) if phase else None)


def test_changes_wake_only_their_job_and_only_when_something_changed() -> None:
    store = PodStore()
    assert store.apply([change("a", "p0", "u1"), change("a", "q0", "u2")]) == {"u1", "u2"}
    assert store.apply([change("a", "p0", "u1")]) == set()  # same view: nobody to wake
    assert store.apply([change("a", "p0", "u1", "Running")]) == {"u1"}
    assert store.by_job["u1"][("a", "p0")].phase == "Running"
    assert store.apply([change("a", "p0", "u1", None)]) == {"u1"}
    assert "u1" not in store.by_job  # no empty entries left behind
    assert store.apply([change("a", "never-seen", "u1", None)]) == set()


def test_a_completed_list_drops_the_scopes_pods_it_did_not_see() -> None:
    store = PodStore()
    store.apply([change("a", "p0", "u1"), change("a", "p1", "u1"), change("b", "r0", "u3")])
    # Namespace a listed again after a 410: p1 was deleted while nobody watched.
    woken = store.apply([change("a", "p0", "u1")], listed={("a", "p0")}, scope="a")
    assert woken == {"u1"} and set(store.by_job["u1"]) == {("a", "p0")}
    assert set(store.by_job["u3"]) == {("b", "r0")}  # another scope's pods stay
    # Cluster-wide list (scope None): everything unseen goes.
    assert store.apply([], listed=set()) == {"u1", "u3"} and store.by_job == {}


def test_a_pod_relabelled_to_another_job_moves() -> None:
    store = PodStore()
    store.apply([change("a", "p0", "u1")])
    moved = Change(("a", "p0"), "u2", replace(view("p0")))
    assert store.apply([moved]) == {"u1", "u2"} and set(store.by_job) == {"u2"}
