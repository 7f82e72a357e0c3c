;; handler: a request/response plugin. alloc(len) returns a buffer at offset 1024 (0 if len
;; does not fit in the one page); handle(ptr, len) writes the input back through `output`.
(module
  (import "forgeone" "output" (func $output (param i32 i32) (result i32)))
  (memory (export "memory") 1)

  (func (export "alloc") (param $len i32) (result i32)
    (if (result i32) (i32.le_u (local.get $len) (i32.const 64512))
      (then (i32.const 1024))
      (else (i32.const 0))))

  (func (export "handle") (param $ptr i32) (param $len i32) (result i32)
    (if (result i32) (i32.lt_s (call $output (local.get $ptr) (local.get $len)) (i32.const 0))
      (then (i32.const 1))
      (else (i32.const 0)))))
