//! Quick expert-FFN rate on this CPU:
//! `cargo run --release -p expertmesh-kernels --example ffn_rate -- [ROWS,..] [WEIGHT_DTYPES,..] [ACT_DTYPE]`
//! (defaults: 24,384,1536 bf16 bf16).
use expertmesh_core::dtype::DType;
use expertmesh_kernels::bench::ffn_rate;
use expertmesh_kernels::cpu::CpuBackend;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn list<T>(arg: Option<&String>, default: Vec<T>, parse: impl Fn(&str) -> Res<T>) -> Res<Vec<T>> {
    match arg {
        None => Ok(default),
        Some(s) => s.split(',').map(|x| parse(x.trim())).collect(),
    }
}

fn main() -> Res<()> {
    let b = CpuBackend::new();
    eprintln!("{}", expertmesh_kernels::ExpertBackend::name(&b));
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rows = list(args.first(), vec![24, 384, 1536], |x| {
        x.parse::<usize>().map_err(|e| format!("rows `{x}`: {e}; expected a count such as 384").into())
    })?;
    let dtypes = list(args.get(1), vec![DType::BF16], |x| Ok(DType::parse(x)?))?;
    let act = match args.get(2) {
        Some(s) => DType::parse(s)?,
        None => DType::BF16,
    };
    for d in dtypes {
        for &r in &rows {
            let x = ffn_rate(&b, 2048, 1024, 4, r, d, act, 1.0)?;
            println!("{} {:>5} rows: {:7.1} GFLOP/s ({:.2} ms)", d.name(), r, x.gflops, x.seconds * 1e3);
        }
    }
    Ok(())
}
