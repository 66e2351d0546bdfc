"""Reading a built TF graph's ordering, for tests that check one op runs after
another."""


def ancestors(op):
    """Every op ``op`` waits for, through data and control inputs."""
    seen, todo = set(), list(op.control_inputs) + [t.op for t in op.inputs]
    while todo:
        cur = todo.pop()
        if cur not in seen:
            seen.add(cur)
            todo += list(cur.control_inputs) + [t.op for t in cur.inputs]
    return seen
