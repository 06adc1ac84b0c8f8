"""Fault-injection helpers: a TCP proxy that can stall or cut connections, a workload that
keeps changes flowing, and a checker that counts lost, duplicated and reordered effects."""
