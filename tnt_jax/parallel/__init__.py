"""Device meshes and shardings."""
