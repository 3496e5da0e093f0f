"""What the tool hands on: the precision plan, strongly typed mixed-precision graphs, trtexec command lines."""
