"""Nova integration of cloudlet: compute driver, Glance image properties, RPC, scheduler weigher."""
