"""Pipeline helpers, installed as `dit_accel.pipelines`: tiny random pipelines of every supported
family (`dit_accel.pipelines.tiny`) for tests and demos that run offline."""
