;; spin: `start` never returns (an endless loop, no imports); the supervisor must kill it
;; at its timeout (timeout_s 1) or CPU budget.
(module
  (memory (export "memory") 1)
  (func (export "start") (result i32)
    (loop $forever (br $forever))
    (i32.const 0)))
