;; memgrow: `start` grows memory by 16 pages (1 MiB) at a time, forever. Once the memory
;; limit (memory_mb 8) makes memory.grow return -1, it traps with `unreachable`.
(module
  (memory (export "memory") 1)
  (func (export "start") (result i32)
    (loop $grow
      (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
    unreachable))
