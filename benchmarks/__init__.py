"""asv benchmark suite of fastopt (see asv.conf.json)."""
