"""Compute kernels remp builds itself where no maintained one fits (see each module)."""
