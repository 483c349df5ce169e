"""A node's counting workers and the memory they share with it: the slots frames are assembled in
(shared-memory blocks, swept when their process is gone), the spawned worker processes and the pool that
hands them batches and takes their results back."""
