"""Discrete-event simulation of one serving instance over a profiled pool (`remp simulate`)."""
