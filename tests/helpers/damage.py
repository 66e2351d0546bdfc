"""Damage to checkpoint files, for the tests that check every reader finds it."""


def flip(path: str, offset: int, mask: int = 0x01) -> None:
    """XORs the byte at ``offset`` with ``mask`` in place: the smallest damage
    a checksum must catch; flipping again with the same mask undoes it."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))
