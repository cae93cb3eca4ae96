//! Parsing and validation of user-supplied VM configuration (CLI values).

use thiserror::Error;

/// A bad value on the command line; each message names the value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "invalid size '{0}': expected a number with an optional K, M, G or T suffix (e.g. 512M, 4G)"
    )]
    MalformedSize(String),
    #[error("invalid size '{0}': too large")]
    SizeOverflow(String),
    #[error("invalid memory size '{0}': must be at least 64M")]
    MemoryTooSmall(String),
    #[error("invalid memory size '{0}': must be a multiple of 4K")]
    MemoryUnaligned(String),
    #[error("invalid --cpus value {0}: must be between 1 and {max}", max = MAX_CPUS)]
    BadCpuCount(u32),
}

/// Most vCPUs we support (APIC IDs fit in the 8-bit xAPIC ID and the MADT helper).
pub const MAX_CPUS: u32 = 64;
/// Smallest guest memory a stock Debian kernel with our initramfs boots in.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Largest guest memory: RAM must end below the 64-bit PCI window (layout.rs).
pub const MAX_MEMORY: u64 = 256 << 30;

/// Parses a size such as `512M`, `4G`, `4GiB`, `1048576` (bytes) into bytes.
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, suffix) = trimmed.split_at(digits_end);
    if digits.is_empty() {
        return Err(ConfigError::MalformedSize(text.to_string()));
    }
    let shift = match suffix.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(ConfigError::MalformedSize(text.to_string())),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| ConfigError::SizeOverflow(text.to_string()))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| ConfigError::SizeOverflow(text.to_string()))
}

/// Parses and validates a guest memory size.
pub fn parse_memory_size(text: &str) -> Result<u64, ConfigError> {
    let bytes = parse_size(text)?;
    if bytes < MIN_MEMORY {
        return Err(ConfigError::MemoryTooSmall(text.to_string()));
    }
    if bytes % 4096 != 0 {
        return Err(ConfigError::MemoryUnaligned(text.to_string()));
    }
    if bytes > MAX_MEMORY {
        return Err(ConfigError::SizeOverflow(text.to_string()));
    }
    Ok(bytes)
}

/// Validates a vCPU count.
pub fn validate_cpus(cpus: u32) -> Result<u32, ConfigError> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(ConfigError::BadCpuCount(cpus));
    }
    Ok(cpus)
}

/// Checks a device's `id=` value (names it in logs and the control API): letters, digits, `-`
/// and `_`; the error is the reason, for the caller's one-line message.
pub fn check_device_id(value: &str) -> Result<(), String> {
    if value.is_empty()
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!("id={value}: use letters, digits, '-' and '_'"));
    }
    Ok(())
}

/// Parses every value of a repeatable device flag (`--FLAG`) with `parse(value, index)`,
/// refusing more than `max` devices and an id used twice.
pub fn parse_device_specs<T>(
    flag: &str,
    specs: &[String],
    max: usize,
    parse: impl Fn(&str, usize) -> Result<T, String>,
    id: impl Fn(&T) -> &str,
) -> Result<Vec<T>, String> {
    if specs.len() > max {
        return Err(format!(
            "too many --{flag} functions ({}): at most {max}",
            specs.len()
        ));
    }
    let parsed = specs
        .iter()
        .enumerate()
        .map(|(i, s)| parse(s, i))
        .collect::<Result<Vec<_>, _>>()?;
    for (i, a) in parsed.iter().enumerate() {
        if parsed[..i].iter().any(|b| id(b) == id(a)) {
            return Err(format!("--{flag} id '{}' is used twice", id(a)));
        }
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_ids_and_repeated_device_flags() {
        assert_eq!(check_device_id("nic-0_a"), Ok(()));
        for bad in ["", "a b", "a,b", "é"] {
            assert!(
                check_device_id(bad)
                    .unwrap_err()
                    .starts_with(&format!("id={bad}:"))
            );
        }
        let parse = |s: &str, i: usize| -> Result<String, String> {
            if s == "bad" {
                return Err("bad spec".into());
            }
            Ok(if s.is_empty() {
                format!("d{i}")
            } else {
                s.to_string()
            })
        };
        let specs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let all = |v: &[&str]| parse_device_specs("dev", &specs(v), 3, parse, |s| s);
        assert_eq!(all(&["", "", "x"]), Ok(specs(&["d0", "d1", "x"])));
        assert_eq!(all(&["", "bad"]), Err("bad spec".into()));
        assert_eq!(
            all(&["a", "", "a"]),
            Err("--dev id 'a' is used twice".into())
        );
        assert_eq!(
            all(&["", "", "", ""]),
            Err("too many --dev functions (4): at most 3".into())
        );
    }

    #[test]
    fn sizes_with_suffixes() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
    }

    #[test]
    fn malformed_sizes_are_rejected_with_the_value() {
        for bad in ["", "G", "4X", "-1G", "4.5G", "four"] {
            let err = parse_size(bad).unwrap_err();
            assert_eq!(err, ConfigError::MalformedSize(bad.to_string()));
            assert!(err.to_string().contains(&format!("'{bad}'")));
        }
        assert!(matches!(
            parse_size("99999999999999999999G"),
            Err(ConfigError::SizeOverflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(ConfigError::SizeOverflow(_))
        ));
    }

    #[test]
    fn memory_limits() {
        assert!(matches!(
            parse_memory_size("1M"),
            Err(ConfigError::MemoryTooSmall(_))
        ));
        assert!(matches!(
            parse_memory_size("67108865"),
            Err(ConfigError::MemoryUnaligned(_))
        ));
        assert_eq!(parse_memory_size("4G"), Ok(4 << 30));
    }

    #[test]
    fn cpu_counts() {
        assert_eq!(validate_cpus(0), Err(ConfigError::BadCpuCount(0)));
        assert_eq!(validate_cpus(65), Err(ConfigError::BadCpuCount(65)));
        assert_eq!(validate_cpus(2), Ok(2));
        assert!(
            validate_cpus(0)
                .unwrap_err()
                .to_string()
                .contains("--cpus value 0")
        );
    }
}
