"""Batched writes to Ethereum's Merkle Patricia Trie, the state trie of area chains.

py-trie's `HexaryTrie` is the reference: it reads and proves (`certlog.light`),
and a trie written here is, node for node, the trie it would hold after the same
`set` calls. It pays for that one key at a time, though: every `set` decodes the
path down from the root, then re-encodes and re-hashes every node on it, so a
block touching a thousand accounts hashes the top of the trie a thousand times
and stores each intermediate version. `Trie` reads a node at most once per batch,
applies every `set` in memory, and at `commit` encodes and hashes each changed
node once, storing only the nodes the new root reaches.

Only what the app needs: `get` and `set` of non-empty values (no deletion), so
an insert-only trie stays in the canonical form without any merging of nodes.

Nodes are RLP (Yellow Paper, appendix B and D): a leaf ``[hp(path, leaf), value]``,
an extension ``[hp(path), child]``, a branch ``[child x 16, value]``; a child is the
keccak-256 of its encoding, or the node itself when that encoding is under 32
bytes; the root is always hashed and stored.
"""

from __future__ import annotations

from typing import MutableMapping, Union

import sha3

__all__ = ["BLANK_ROOT", "Trie", "rlp_encode", "rlp_decode"]

# A reference to a node as its parent holds it: b"" (none), a 32-byte hash, or a small
# node inline (its decoded RLP list).
Ref = Union[bytes, list]


def keccak256(data: bytes) -> bytes:
    return sha3.keccak_256(data).digest()


BLANK_ROOT = keccak256(b"\x80")  # the empty trie: keccak of rlp(b"")

# Nibble paths are bytes with one nibble (0-15) per byte: sliced and compared natively.
_TO_NIBBLES = bytes.maketrans(b"0123456789abcdef", bytes(range(16)))
_FROM_NIBBLES = bytes.maketrans(bytes(range(16)), b"0123456789abcdef")


def _nibbles(key: bytes) -> bytes:
    return key.hex().encode("ascii").translate(_TO_NIBBLES)


def _hex_prefix(path: bytes, leaf: bool) -> bytes:
    """Compact encoding of a nibble path: a flag nibble (2 for a leaf, +1 when odd),
    a padding nibble when even, then the path, two nibbles a byte."""
    flag = (2 if leaf else 0) + (len(path) & 1)
    head = bytes((flag,)) if len(path) & 1 else bytes((flag, 0))
    return bytes.fromhex((head + path).translate(_FROM_NIBBLES).decode("ascii"))


def _unhex_prefix(data: bytes) -> tuple[bytes, bool]:
    """(path, is leaf) of a compact-encoded path."""
    if not data:
        raise ValueError("empty hex-prefix path")
    nib = _nibbles(data)
    flag = nib[0]
    if flag > 3 or (not flag & 1 and nib[1] != 0):
        raise ValueError("bad hex-prefix flag")
    return nib[1:] if flag & 1 else nib[2:], flag >= 2


# -- RLP of byte strings and lists, all a node or a leaf value is ----------------------

def _length_prefix(n: int, offset: int) -> bytes:
    if n < 56:
        return bytes((offset + n,))
    ln = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((offset + 55 + len(ln),)) + ln


# The one-byte prefixes of short strings and lists, made once: a block encodes
# thousands of nodes, most of their items 32-byte hashes and empty strings.
_STRING_PREFIX = [bytes((0x80 + n,)) for n in range(56)]
_LIST_PREFIX = [bytes((0xC0 + n,)) for n in range(56)]


def rlp_encode(item: bytes | list) -> bytes:
    """RLP of a byte string or a (nested) list of them, as `rlp.encode` gives it.

    A list's byte strings are encoded in its own loop, not by a call each: a
    branch node is 17 of them, and this is most of a block's trie work."""
    if isinstance(item, (bytes, bytearray)):
        n = len(item)
        if n == 1 and item[0] < 0x80:
            return bytes(item)
        return (_STRING_PREFIX[n] if n < 56 else _length_prefix(n, 0x80)) + item
    parts = []
    add = parts.append
    for x in item:
        if type(x) is bytes:
            n = len(x)
            if n >= 56:
                add(_length_prefix(n, 0x80))
            elif n != 1 or x[0] >= 0x80:
                add(_STRING_PREFIX[n])
            add(x)
        else:
            add(rlp_encode(x))
    payload = b"".join(parts)
    n = len(payload)
    return (_LIST_PREFIX[n] if n < 56 else _length_prefix(n, 0xC0)) + payload


def rlp_decode(data: bytes) -> bytes | list:
    """The item `rlp_encode` made `data` from; ValueError unless it is exactly one
    item. Lengths are not checked for being minimal: only canonical RLP is ever
    written, and callers that take outside bytes compare with `rlp_encode` again."""
    item, end = _decode_at(data, 0)
    if end != len(data):
        raise ValueError("trailing bytes after an RLP item")
    return item


def _decode_at(data: bytes, pos: int) -> tuple[bytes | list, int]:
    size = len(data)
    if pos >= size:
        raise ValueError("RLP item past the end")
    b = data[pos]
    if b < 0x80:
        return data[pos:pos + 1], pos + 1
    if b < 0xB8:
        start, end = pos + 1, pos + 1 + b - 0x80
    elif b < 0xC0:
        start = pos + 1 + b - 0xB7
        end = start + int.from_bytes(data[pos + 1:start], "big")
    elif b < 0xF8:
        start, end = pos + 1, pos + 1 + b - 0xC0
    else:
        start = pos + 1 + b - 0xF7
        end = start + int.from_bytes(data[pos + 1:start], "big")
    if end > size:
        raise ValueError("RLP item past the end")
    if b < 0xC0:
        return data[start:end], end
    items = []
    add = items.append
    while start < end:
        b = data[start]
        if b < 0x80:  # the list's short strings inline, as rlp_encode writes them
            add(data[start:start + 1])
            start += 1
        elif b < 0xB8:
            stop = start + 1 + b - 0x80
            if stop > end:
                raise ValueError("RLP list item past its list")
            add(data[start + 1:stop])
            start = stop
        else:
            item, start = _decode_at(data, start)
            add(item)
    if start != end:
        raise ValueError("RLP list item past its list")
    return items, end


# -- the trie ------------------------------------------------------------------------

class _Node:
    """A node read into memory; `ref` is how its parent refers to it while it is
    unchanged (None once changed: it must be encoded again)."""
    __slots__ = ("ref",)


class _Leaf(_Node):
    __slots__ = ("path", "value")

    def __init__(self, path: bytes, value: bytes, ref: Ref | None = None):
        self.path, self.value, self.ref = path, value, ref


class _Extension(_Node):
    __slots__ = ("path", "child")

    def __init__(self, path: bytes, child: Ref | _Node, ref: Ref | None = None):
        self.path, self.child, self.ref = path, child, ref


class _Branch(_Node):
    __slots__ = ("children", "value")

    def __init__(self, children: list, value: bytes = b"", ref: Ref | None = None):
        self.children, self.value, self.ref = children, value, ref


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Trie:
    """A batch of reads and writes on the trie at `root`, stored in `db` on `commit`."""

    def __init__(self, db: MutableMapping[bytes, bytes], root: bytes = BLANK_ROOT):
        self.db = db
        self.root_hash = root
        self._root: _Node | Ref = b"" if root == BLANK_ROOT else root

    def _load(self, ref: _Node | Ref) -> _Node | None:
        """The node behind `ref`, read from the store (or inline) if not yet in memory."""
        if isinstance(ref, _Node):
            return ref
        if isinstance(ref, list):
            raw = ref
        elif ref == b"":
            return None
        elif len(ref) == 32:
            raw = rlp_decode(self.db[ref])
            if not isinstance(raw, list):
                raise ValueError("a trie node is an RLP list")
        else:
            raise ValueError(f"bad node reference of {len(ref)} bytes")
        if len(raw) == 17:
            return _Branch(raw[:16], raw[16], ref)
        if len(raw) == 2:
            path, leaf = _unhex_prefix(raw[0])
            return _Leaf(path, raw[1], ref) if leaf else _Extension(path, raw[1], ref)
        raise ValueError(f"a trie node has 2 or 17 items, not {len(raw)}")

    def get(self, key: bytes) -> bytes:
        """The value under `key`, b"" when there is none (as `HexaryTrie.get`)."""
        path = _nibbles(key)
        node = self._root = self._load(self._root) or b""
        while isinstance(node, _Node):
            if isinstance(node, _Leaf):
                return node.value if node.path == path else b""
            if isinstance(node, _Extension):
                if path[:len(node.path)] != node.path:
                    return b""
                path = path[len(node.path):]
                node.child = child = self._load(node.child) or b""
            else:
                if not path:
                    return node.value
                node.children[path[0]] = child = self._load(node.children[path[0]]) or b""
                path = path[1:]
            node = child
        return b""

    def set(self, key: bytes, value: bytes) -> None:
        """Put `value` under `key`, in memory until `commit`."""
        if not value:
            raise ValueError("an empty value would delete the key; deletion is not supported")
        self._root = self._put(self._root, _nibbles(key), value)

    def _put(self, ref: _Node | Ref, path: bytes, value: bytes) -> _Node:
        node = self._load(ref)
        if node is None:
            return _Leaf(path, value)
        node.ref = None  # on the path of a change: encoded again at commit
        if isinstance(node, _Branch):
            if path:
                node.children[path[0]] = self._put(node.children[path[0]], path[1:], value)
            else:
                node.value = value
            return node
        if isinstance(node, _Leaf) and node.path == path:
            node.value = value
            return node
        common = _common_prefix(node.path, path)
        if isinstance(node, _Extension) and common == len(node.path):
            node.child = self._put(node.child, path[common:], value)
            return node
        # The paths part ways after `common` nibbles: a branch there, under an
        # extension for the common part if there is one.
        branch = _Branch([b""] * 16)
        old, new = node.path[common:], path[common:]
        if not old:  # only a leaf's path can end here: its value moves into the branch
            branch.value = node.value  # type: ignore[union-attr]
        elif isinstance(node, _Extension) and len(old) == 1:
            branch.children[old[0]] = node.child
        else:
            node.path = old[1:]
            branch.children[old[0]] = node
        if new:
            branch.children[new[0]] = _Leaf(new[1:], value)
        else:
            branch.value = value
        return _Extension(path[:common], branch) if common else branch

    def commit(self) -> bytes:
        """Store every changed node and return the new root hash."""
        root = self._root
        if isinstance(root, _Node) and root.ref is None:
            encoded = rlp_encode(self._raw(root))
            self.root_hash = keccak256(encoded)
            self.db[self.root_hash] = encoded  # the root is stored even when small
            root.ref = self.root_hash
        return self.root_hash

    def _ref(self, node: _Node | Ref) -> Ref:
        """How a parent refers to `node`, storing it first if it changed."""
        if not isinstance(node, _Node):
            return node
        if node.ref is None:
            raw = self._raw(node)
            encoded = rlp_encode(raw)
            if len(encoded) < 32:
                node.ref = raw
            else:
                node.ref = keccak256(encoded)
                self.db[node.ref] = encoded
        return node.ref

    def _raw(self, node: _Node) -> list:
        if isinstance(node, _Leaf):
            return [_hex_prefix(node.path, True), node.value]
        if isinstance(node, _Extension):
            return [_hex_prefix(node.path, False), self._ref(node.child)]
        # Most children are references already (a hash, b"" or an inline list): only a
        # node read into memory needs `_ref`, so the others cost no call.
        ref = self._ref
        children = node.children  # type: ignore[attr-defined]
        return [ref(c) if isinstance(c, _Node) else c for c in children] + [node.value]  # type: ignore[attr-defined]
