"""The fault matrix (issue 11 item 5): two daemons in their own network namespaces joined by a
veth pair, a fault injected at a random point of every migration phase, every outcome classified.

`netlink` builds the namespaces and shapes or cuts the link, `cluster` runs the two daemons and
watches their logs, `plan` makes the seeded choices, `inject` strikes and heals, `outcome`
classifies what is left, `matrix` runs the whole and writes the JSON. Entry: `bench/faults.py`.
"""
