# Type stubs of the compiled COPY row loop (_copyrows.pyx).
from shardproxy._hash import HashRing

def route_lines(buf: bytes, pos: int, end: int, out: list[bytearray], ring: HashRing, delimiter: bytes,
                key_index: int, null: bytes, key_kind: int, special: bytes) -> tuple[int, int]: ...
def route_tuples(buf: bytes, pos: int, out: list[bytearray], ring: HashRing, key_index: int,
                 key_kind: int) -> tuple[int, int]: ...
