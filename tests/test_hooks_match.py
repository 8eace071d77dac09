"""The match hook passes a device hit's page keys to the linker once per request and hit."""

from types import SimpleNamespace

from hcache_sglang.serving import hooks


def _wrapper(notes, walks):
    def prefix_hashes(node):
        walks.append(node)
        return [f"{node}-p{i}" for i in range(3)]

    cache = SimpleNamespace(page_size=16, get_prefix_hash_values=prefix_hashes,
                            tree_core=SimpleNamespace(get_hash_values=lambda node: [f"{node}-own"]))
    return SimpleNamespace(cache=cache, cache_linker=SimpleNamespace(device_hit=notes.append))


def test_a_waiting_request_matched_again_passes_its_device_hit_once():
    notes, walks = [], []
    wrapper = _wrapper(notes, walks)
    result = SimpleNamespace(device_prefix_len=3 * 16 + 5, last_device_node=7)

    def match(rid):
        hooks.note_device_hit(wrapper, SimpleNamespace(rid=rid), result)

    for _ in range(5):  # the scheduler matches a waiting request at every attempt
        match("r1")
    assert notes == [["7-p0", "7-p1", "7-p2"]] and walks == [7]
    match("r2")  # another request on the same prefix is a use of its own
    assert len(notes) == 2
    match(None)  # no request id: never taken for a repeat
    match(None)
    assert len(notes) == 4


def test_a_failing_tree_never_fails_the_match():
    notes = []
    wrapper = _wrapper(notes, [])
    wrapper.cache.get_prefix_hash_values = None  # not callable: the walk raises
    result = SimpleNamespace(device_prefix_len=32, last_device_node=[1])  # unhashable as well
    hooks.note_device_hit(wrapper, SimpleNamespace(rid="r"), result)
    assert notes == []
